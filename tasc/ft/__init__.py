"""TASC-ft, vocabulary rounds: choose frequent output n-grams as new tokens (``select``), add them
to the tokenizer and initialise their embeddings from their pieces (``expand``), fine-tune and
repeat until the gain plateaus (``rounds``)."""
