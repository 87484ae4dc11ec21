"""One FusionBench merge of safetensors files, as its algorithms compute it.

Runs inside the peers' virtual environment (``run.py`` creates it), never
ours. Loads the base and the fine-tuned files with ``safetensors.torch``,
merges with FusionBench's own functions (``task_arithmetic_merge``'s state
dict arithmetic; ``TiesMergingAlgorithm.run``'s flatten, ``ties_merging``,
unflatten) and saves the merged state dict.

    python fusionbench_merge.py {ta,ties} OUT BASE FT [FT ...] --scale S [--keep K]
"""

import argparse

from safetensors.torch import load_file, save_file

ap = argparse.ArgumentParser()
ap.add_argument("method", choices=("ta", "ties"))
ap.add_argument("out")
ap.add_argument("base")
ap.add_argument("finetuned", nargs="+")
ap.add_argument("--scale", type=float, required=True)
ap.add_argument("--keep", type=float, default=0.2)
ap.add_argument("--merge-func", default="mean")
args = ap.parse_args()

base = load_file(args.base)
fts = [load_file(f) for f in args.finetuned]
if args.method == "ta":
    from fusion_bench.utils.state_dict_arithmetic import (
        state_dict_add,
        state_dict_mul,
        state_dict_sub,
    )

    tv = None
    for ft in fts:  # task_arithmetic_merge's loop
        d = state_dict_sub(ft, base)
        tv = d if tv is None else state_dict_add(tv, d)
    merged = state_dict_add(base, state_dict_mul(tv, args.scale))
else:
    import torch
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        state_dict_to_vector,
        ties_merging,
        vector_to_state_dict,
    )

    flat_ft = torch.vstack([state_dict_to_vector(f) for f in fts])
    flat_ptm = state_dict_to_vector(base)
    merged_tv = ties_merging(flat_ft - flat_ptm, reset_thresh=100 * args.keep,
                             merge_func=args.merge_func)
    merged = vector_to_state_dict(flat_ptm + args.scale * merged_tv, base)
save_file({k: v.contiguous() for k, v in merged.items()}, args.out)
