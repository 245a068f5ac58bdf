"""TASC-spec, decoding: the n-gram draft stored as text (``draft``), the proposer that mixes task
and context n-grams into a chunk (``proposer``), the verify loop (``engine``, ``batch_engine``)
and harvesting the model's own outputs for the draft (``harvest``)."""
