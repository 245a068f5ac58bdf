"""Stage 2, n-gram statistics of the task's outputs: exact counts at text and token level
(``counts``) and their sharded, mergeable form (``shards``)."""
