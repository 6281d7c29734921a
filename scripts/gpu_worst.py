"""The largest error of each GPU test against its bound, from the `ERR | test | tensor | err | bound` lines the GPU
tests print. Used by scripts/gpu_check.sh and scripts/gpu_tp_check.sh:
    python3 scripts/gpu_worst.py errors.txt [width]
"""

import sys


def main(path: str, width: int = 48) -> None:
    worst = {}
    for line in open(path):
        f = [x.strip() for x in line.split("|")]
        if f[0] == "ERR":
            err, bound = float(f[3]), float(f[4])
            if f[1] not in worst or err / bound > worst[f[1]][0]:
                worst[f[1]] = (err / bound, f[2], err, bound)
    for test, (r, name, err, bound) in sorted(worst.items()):
        print(f"{test:<{width}} {name:<44} {err:.2e} / {bound:.1e} = {r:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 48)
