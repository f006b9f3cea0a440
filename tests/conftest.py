"""Without a GPU, Triton's kernels run in its CPU interpreter, which is chosen when triton is
first imported: set it before anything imports triton. (The library runs them only when asked to
on the CPU: `use_triton=True`.)"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
