"""Network programs: layers with roles, abc-parametrizations, losses and SGD, at finite width
(`finite.py`), unrolled into a Netsor-transpose program (`unroll.py`), and in the limit
(`limit.py`: feature learning by the unrolled program, the kernel regime by `kernel.py`)."""
