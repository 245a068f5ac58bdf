"""CPU speed machinery behind the decoders, outside the algorithm: C kernels built at first use
(``native``, ``kernels/``), packed small-batch linears (``packed``), grouped-query attention
(``attention``), the exact argmax head (``argmax_head``), the lean decoder forward
(``lean_decoder``) and the backend that applies them (``backend``). Every piece keeps greedy
speculative decoding bitwise identical to plain greedy."""
