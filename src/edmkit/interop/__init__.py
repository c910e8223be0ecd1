"""Networks from other projects' files: NVIDIA's EDM / EDM2 pickles read as data (``pickle_reader``) and mapped onto
edmkit's backbones (``nvidia``); ``edmkit import`` on the command line."""
