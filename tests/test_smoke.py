import torch
import torch.nn.functional as F

import ln_ext


def test_forward_matches_functional_layer_norm():
    x = torch.randn(4, 7, 33, dtype=torch.float64)
    w, b = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    torch.testing.assert_close(ln_ext.layer_norm(x, (33,), w, b), F.layer_norm(x, (33,), w, b))
