"""python -m preprocess: the command-line stage; thin wrappers over motion_data."""
