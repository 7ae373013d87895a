"""Fine-grained upcycling (Megatron-Core's granular upcycling; Qwen1.5-MoE style): each FFN is cut into G
contiguous parts of its neurons, and the G parts are replicated R times, N = G x R experts. Expert e holds
part e mod G of replica e div G.

The G experts of one replica (a virtual group) share one router row, so they get the same routing weight
and, with top-k a multiple of G, top-k keeps whole replicas. A replica's parts add up to the dense FFN; with
down_proj scaled by G and renormalised weights the MoE computes the dense FFN for any (non-tied) router.

`--fine-grained-scale` says where the factor s (G, times N/k under softmax-topk) goes:
- down: down_proj x s. Exact: the FFN is linear in down_proj.
- cube-root: gate, up and down each x s^(1/3), as Megatron-Core's upcycling_utils does for gated linear units.
  Up and down are linear, so they give s^(2/3); the last s^(1/3) would have to pass through the activation,
  act(c z) = c act(z), which holds for ReLU (positively homogeneous) but not for SiLU or GELU: silu(c z) is
  c silu(z) only for z >> 0, and e.g. silu(1.587 * -1) = -0.269 against 1.587 * silu(-1) = -0.427. So it is
  never claimed exact (every supported family gates with SiLU); benchmarks/README.md measures how far off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import UpcycleError
from .base import Layout, expert, parts_transform, routing_factor, zero_router
from .split import check_divides

if TYPE_CHECKING:
    from ..spec import ConvertSpec


def layout(spec: ConvertSpec, hidden: int, intermediate: int) -> Layout:
    g, n, k = spec.granularity, spec.experts, spec.top_k
    if g is None:
        raise UpcycleError("--init fine-grained needs --granularity G, the number of parts each FFN is cut into")
    if g < 1:
        raise UpcycleError(f"--granularity {g} must be 1 or more")
    if n % g:
        raise UpcycleError(f"--experts {n} must be a multiple of --granularity {g} (N = G x replicas)")
    if k % g:
        raise UpcycleError(
            f"--top-k {k} must be a multiple of --granularity {g}, so that each token gets whole replicas of the FFN"
        )
    if spec.shared_experts:
        raise UpcycleError(
            "--shared-experts with --init fine-grained is not available yet; use --init split or clone for a "
            "shared expert"
        )
    fits = [d for d in range(1, intermediate + 1) if intermediate % d == 0 and n % d == 0 and k % d == 0]
    check_divides(intermediate, g, "--granularity", fits)
    size, scale = intermediate // g, g * routing_factor(spec)
    gate_up, down = (1.0, scale) if spec.scale_mode == "down" else (scale ** (1 / 3),) * 2
    experts = tuple(
        expert(
            hidden,
            size,
            parts_transform("contiguous", g, (e % g,), gate_up),
            parts_transform("contiguous", g, (e % g,), down),
        )
        for e in range(n)
    )
    exact, why = exactness(spec, g, scale)
    if spec.scale_mode == "cube-root":
        exact, why = (
            False,
            (
                f"gate, up and down_proj are each scaled by {scale:g}^(1/3) = {down:.4g} (Megatron-Core's cube root); "
                "the gate's share passes through SiLU, and silu(c z) != c silu(z), so the parts do not add up to the "
                "dense FFN (use --fine-grained-scale down for an exact start)"
            ),
        )
    return Layout(size, experts, exact, why, router_group=g)


def exactness(spec: ConvertSpec, g: int, scale: float) -> tuple[bool, str]:
    scaled, k = f"down_proj scaled by {scale:g}", spec.top_k
    if k == spec.experts:
        return True, f"every expert runs; each replica's {g} parts ({scaled}) add up to the dense FFN, weights to one"
    if spec.renormalize and not zero_router(spec):
        return True, (
            f"router rows are shared within each virtual group of {g} experts, so top-{k} keeps whole replicas "
            f"of the FFN, whose parts ({scaled}) add up to the dense FFN; the kept weights sum to one"
        )
    if spec.renormalize:
        return False, (
            "a zero router ties every logit, so torch.topk, not the virtual groups, decides which parts each "
            "token keeps; use --router-init random for an exact start"
        )
    return False, (
        f"without renormalisation the kept weights only sum to k/N under a zero router ({scaled} for that), "
        "whose tied logits leave the choice of parts to torch.topk"
    )
