"""The lean FSQ motion-tokenizer trainer (``python -m tokenizer_train``)."""
