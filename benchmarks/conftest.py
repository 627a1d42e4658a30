import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="op benchmarks run at WRN-34-10 sizes on a GPU only")
