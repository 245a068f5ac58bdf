"""CPU speed machinery behind the decoders, outside the algorithm: C kernels built at first use
(``native``, ``kernels/``), packed small-batch linears (``packed``), grouped-query attention
(``attention``), the exact argmax head (``argmax_head``), the lean decoder forward
(``lean_decoder``), the backend that applies them and runs a request's forward passes
(``backend``), and the compiled draft lookups and walks (``draft_kernels``). Every piece keeps
greedy speculative decoding bitwise identical to plain greedy."""
