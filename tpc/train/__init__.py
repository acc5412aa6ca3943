"""Network programs and their training: layers with roles, abc-parametrizations, losses, and
training written as loops (`loops.py`; `train sgd`/`train fomaml`/`train cbow` desugar to loops in
`desugar.py`), run by one interpreter (`interp.py`) at finite width (`dense.py`), as the unrolled
Netsor-transpose program at width n or in the feature-learning limit (`pooled.py` on
`spaces.py`), and in the kernel regime (`kernel_loops.py` with `kernel.py`'s kernels). word2vec's
loop runs on tables of word vectors (`tables.py`, with `cbow.py`'s stream and scales)."""
