"""The command line: a thin map from sub-commands to stage entry functions."""
