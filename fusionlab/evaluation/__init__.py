"""Downstream evaluation: CIDEr-D, digit accuracy and question answering on the sample scenes."""
