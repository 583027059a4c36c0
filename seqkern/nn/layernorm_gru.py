"""seqkern.nn.LayerNormGRU: the multi-layer LayerNorm GRU (reset-after, as torch.nn.GRU) with zoneout, lengths and
resets, on seqkern.ops.layernorm_gru. Constructor, parameters and forward: seqkern/nn/layernorm_lstm.py's
LayerNormRecurrentBase."""
from __future__ import annotations

from seqkern.nn.layernorm_lstm import LayerNormRecurrentBase
from seqkern.ops.layernorm_gru import layernorm_gru_layer


class LayerNormGRU(LayerNormRecurrentBase):
    """Multi-layer LayerNorm GRU (issue 16):
        gx = LN(x W_ih^T) + b_ih,  gh = LN(h W_hh^T) + b_hh,  r, z, n gates in torch.nn's order
        r = sigmoid(gx_r + gh_r), z = sigmoid(gx_z + gh_z), n = tanh(gx_n + r gh_n), h' = (1 - z) n + z h
    forward(input, hx=None, lengths=None, resets=None) -> output, h_n, as torch.nn.GRU."""

    GATES, STATES, CELL_NORM, mode = 3, ("h",), False, "LayerNormGRU"

    def _run_layer(self, x, states, p, lengths, resets, zoneout, seed, reverse):
        output, h_n = layernorm_gru_layer(
            x, states[0], p["weight_ih"], p["weight_hh"], p.get("bias_ih"), p.get("bias_hh"), p["ln_ih_weight"],
            p["ln_ih_bias"], p["ln_hh_weight"], p["ln_hh_bias"], self.eps, lengths, resets, zoneout, seed, reverse)
        return output, (h_n,)
