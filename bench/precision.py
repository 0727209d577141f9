"""Precision of the bf16 kernels beside fla's, against the float64 token-by-token reference (issue 4).

On bf16 inputs (paper heads, B2 T700 H2 K96 V192, no initial state), the relative error ||o - ref|| / ||ref||
of the outputs of
  ours                 chunk_kla (Triton), as shipped: bf16 product operands, bf16 intermediates
  ours_tf32            the same kernels with tf32 product operands (diagnostic: chunk_triton.numerics swapped)
  ours_tf32_fp32_mid   tf32 operands and fp32 intermediates (Ainv, w, u, h, vn)
  fla_kla              fla's chunk_gated_delta_rule on KLA prepared in PyTorch (forward only: under Triton
                       < 3.7.1 fla's gated backward is not trusted on Hopper, fla #640)
for random keys at three scales and the adversarial case of the GPU tests (one key repeated, eta 0.99, no
decay), where the chunk form's w = Ainv X and vn = u - w h come from cancelling terms. Prints a table,
writes JSON.

    python bench/precision.py --out bench/results/precision.json
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.kernels import fla_kla, make_inputs  # noqa: E402
from bench.peers import unlock_fla_backward  # noqa: E402
from kernels import chunk_kla, naive_recurrent_kla  # noqa: E402
from kernels.kla import chunk_triton  # noqa: E402

SHIPPED = chunk_triton.numerics
NUMERICS = {"ours": SHIPPED,
            "ours_tf32": lambda x: (dict(DOT_DTYPE=tl.float32, DOT_PREC="tf32"), torch.bfloat16),
            "ours_tf32_fp32_mid": lambda x: (dict(DOT_DTYPE=tl.float32, DOT_PREC="tf32"), torch.float32)}


def random_keys(scale):
    def change(q, k, v, g, eta):
        return q, (k.float() * scale).bfloat16(), v, g, eta
    return change


def repeated_key(q, k, v, g, eta):
    return q, k[:, :1].expand_as(k).contiguous(), v, torch.zeros_like(g), torch.full_like(eta, 0.99)


CASES = {"random keys x1e-3": random_keys(1e-3), "random keys x1": random_keys(1.0),
         "random keys x1e3": random_keys(1e3), "one key repeated, eta 0.99, no decay": repeated_key}


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/precision.json")
    args = parser.parse_args()
    unlock_fla_backward()  # only the forward is compared; see the docstring
    torch.manual_seed(0)
    rows = []
    for case, change in CASES.items():
        q, k, v, g, eta = change(*make_inputs(2, 700, 2, 96, 192, requires_grad=False))
        ref = naive_recurrent_kla(q, k, v, g, eta)[0]
        row = {"case": case}
        for name, numerics in NUMERICS.items():
            chunk_triton.numerics = numerics
            row[name] = relative_error(chunk_kla(q, k, v, g, eta)[0], ref)
        chunk_triton.numerics = SHIPPED
        row["fla_kla"] = relative_error(fla_kla(q, k, v, g, eta), ref)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "measure": "relative error of o vs float64 reference, bf16 inputs, B2 T700 H2 K96 V192", "rows": rows}
    columns = [*NUMERICS, "fla_kla"]
    print(f"\n{result['device']}  {result['measure']}\n{'case':38} " + " ".join(f"{c:>18}" for c in columns))
    for r in rows:
        print(f"{r['case']:38} " + " ".join(f"{r[c]:18.1e}" for c in columns))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
