"""Benchmark: vectorised property scores (segmentation/) against a per-pixel-loop implementation of the same algorithms.

The loop implementation below exists only here, as the baseline: Python double loops over the 224x224 map,
as upstream scores images, and the O(n^2) farthest-pair search for the algorithm-2 eyes. Both run in this
process on the same decoded arrays (the stage-4 fixtures in tests/data), the results are checked
equal, and the per-image times and their ratio are printed. File decoding is timed separately.

    python bench/bench_property_scores.py                       # 8 loop images per algorithm, < 1 min
    python bench/bench_property_scores.py --loop-images 37 --repeat 20
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from ohlora.constants import PARSING_SIZE
from ohlora.layout import PARSING_MAP_GLOB, face_crop_name, image_name, parse_img_no, parsing_map_name
from segmentation import property_scores_alg1 as alg1
from segmentation import property_scores_alg2 as alg2
from segmentation.property_scores_common import read_bgr, read_parsing_map

N = PARSING_SIZE
FIXTURES = Path(__file__).resolve().parents[1] / 'tests' / 'data' / 'ohlora' / 'property_scores' / 'fixtures'


# ------------------------------------------------------------------------------------------------------------
# Baseline: the same definitions (spec §6.2-6.4) written with per-pixel Python loops.

def loop_background(pmap, colour):
    values = []
    for y in range(N // 2):
        for x in range(N):
            if pmap[y][x] == 0:
                values.append((int(colour[y][x][0]) + int(colour[y][x][1]) + int(colour[y][x][2])) / 3)
    n = len(values)
    if n == 0:
        return 192.0, 0.0
    if n == 1:
        return values[0], 0.0
    values.sort()
    kept = values[int(0.05 * n):int(0.95 * n)]
    if len(kept) == 1:
        return kept[0], 0.0
    return float(np.mean(kept)), float(np.std(kept))


def loop_span(pmap, classes, y0, y1, x0, x1):
    lo, hi = None, None
    for y in range(y0, y1):
        for x in range(x0, x1):
            if pmap[y][x] in classes:
                lo = y if lo is None else lo
                hi = y
    return 0 if lo is None else hi - lo


def loop_alg1(pmap, colour):
    q, h = N // 4, 3 * N // 8
    eyes = (loop_span(pmap, (4,), q, q + h, 0, 3 * N // 4) + loop_span(pmap, (5,), q, q + h, q, N)) / 2
    hair_values, hair_max_y, nose_x, nose_y = [], None, [], []
    for y in range(N):
        for x in range(N):
            c = pmap[y][x]
            if c == 10:
                hair_values.append((int(colour[y][x][0]) + int(colour[y][x][1]) + int(colour[y][x][2])) / 3)
                hair_max_y = y
            elif c == 6:
                nose_x.append(x)
                nose_y.append(y)
    hair_color = float(np.median(hair_values)) if hair_values else 127.5
    if hair_max_y is None:
        hair_length = 0.0
    elif hair_max_y == N - 1:
        hair_length = (N - 1) + sum(1 for x in range(N) if pmap[N - 1][x] == 10) / 2
    else:
        hair_length = float(hair_max_y)
    mouth = loop_span(pmap, (7, 9), 0, N, 0, N) + loop_span(pmap, (8,), 0, N, 0, N)
    if len(nose_x) < 2 or len(set(nose_x)) < 2 or len(set(nose_y)) < 2:
        pose = 0.0
    else:
        pose = float(-np.corrcoef(nose_x, nose_y)[0][1])
    return (eyes, hair_color, hair_length, float(mouth), pose) + loop_background(pmap, colour)


def loop_eye(pmap, cls, x0, x1):
    q = N // 4
    pixels, height = [], 0
    for x in range(x0, x1):
        lo = hi = None
        for y in range(q, 3 * N // 4):
            if pmap[y][x] == cls:
                pixels.append((y, x))
                lo = y if lo is None else lo
                hi = y
        if lo is not None:
            height = max(height, hi - lo)
    best, pair = 0, None
    for i in range(len(pixels)):
        for j in range(i):
            d = (pixels[i][0] - pixels[j][0]) ** 2 + (pixels[i][1] - pixels[j][1]) ** 2
            if d > best:
                best, pair = d, (pixels[i], pixels[j])
    cos = 1.0 if pair is None else abs(pair[0][1] - pair[1][1]) / math.sqrt(best)
    return height, cos, pixels


def loop_alg2(pmap, face):
    lh, lcos, left = loop_eye(pmap, 4, 0, 3 * N // 4)
    rh, rcos, right = loop_eye(pmap, 5, N // 4, N)
    eyes = max(lh * lcos, rh * rcos)
    if left and right:
        dx = np.mean([p[1] for p in right]) - np.mean([p[1] for p in left])
        dy = np.mean([p[0] for p in right]) - np.mean([p[0] for p in left])
        pose = 0.0 if dx == 0 else float(dy / dx)
    else:
        pose = 0.0
    hair_values, rows, counts = [], 0, [0] * 12
    for y in range(N):
        in_row = 0
        for x in range(N):
            c = pmap[y][x]
            counts[c] += 1
            if c == 10:
                in_row += 1
                hair_values.append((int(face[y][x][0]) + int(face[y][x][1]) + int(face[y][x][2])) / 3)
        if y >= N // 4 and in_row >= 20:
            rows += 1
        if y == N - 1 and in_row >= 20:
            left_n = sum(1 for x in range(N // 2) if pmap[y][x] == 10)
            rows += max(left_n - 10, 0) / 2 + max(in_row - left_n - 10, 0) / 2
    hair_values.sort()
    n = len(hair_values)
    kept = hair_values[int(0.1 * n):int(0.9 * n)]
    hair_color = float(np.mean(kept)) if kept else 127.5
    lips_inner = counts[7] + counts[8] + counts[9]
    mouth = counts[8] / lips_inner if lips_inner else 0.0
    return (float(eyes), hair_color, float(rows), mouth, pose) + loop_background(pmap, face)


# ------------------------------------------------------------------------------------------------------------

def load_cases():
    cases = []
    for map_path in sorted(FIXTURES.glob(PARSING_MAP_GLOB)):
        n = parse_img_no(map_path.name)
        cases.append((n, read_parsing_map(map_path), alg1.read_colour(FIXTURES / image_name(n)),
                      read_bgr(FIXTURES / face_crop_name(n), 'face crop')))
    return cases


def per_image_seconds(fn, items, repeat):
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(*item)
        best = min(best, time.perf_counter() - start)
    return best / len(items)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--loop-images', type=int, default=8, help='images timed with the loop baseline (default 8)')
    parser.add_argument('--repeat', type=int, default=5, help='repeats of the vectorised timing (best kept)')
    args = parser.parse_args()
    if not FIXTURES.is_dir():
        raise SystemExit(f'fixtures not found at {FIXTURES}; they are part of the repository')
    cases = load_cases()
    # Every 4th case first: a spread of ordinary faces and edge cases for the loop subset.
    subset = (cases[::4] + [c for i, c in enumerate(cases) if i % 4])[:args.loop_images]

    numbers = [case[0] for case in cases]
    decoders = {
        2: lambda n: (read_parsing_map(FIXTURES / parsing_map_name(n)), alg1.read_colour(FIXTURES / image_name(n))),
        3: lambda n: (read_parsing_map(FIXTURES / parsing_map_name(n)),
                      read_bgr(FIXTURES / face_crop_name(n), 'face crop')),
    }
    print(f'{len(cases)} fixture images (tests/data/ohlora/property_scores)')
    for name, fast, slow, colour_index in (('algorithm 1', alg1.compute_scores, loop_alg1, 2),
                                           ('algorithm 2', alg2.compute_scores, loop_alg2, 3)):
        decode = per_image_seconds(decoders[colour_index], [(n,) for n in numbers], 2)
        fast_items = [(case[0], case[1], case[colour_index]) for case in cases]
        # The baseline as upstream runs it: loops indexing the decoded numpy arrays; and a kinder variant
        # that first converts them to Python lists (faster element access).
        array_items = [(case[1], case[colour_index]) for case in subset]
        list_items = [(case[1].tolist(), case[colour_index].tolist()) for case in subset]
        for case, item in zip(subset, list_items):  # the baseline must compute the same numbers
            expected = fast(case[0], case[1], case[colour_index]).values
            got = slow(*item)
            if any(abs(a - b) > 1e-9 for a, b in zip(expected, got)):
                raise SystemExit(f'{name}: loop baseline disagrees on case {case[0]}: {got} vs {expected}')
        t_fast = per_image_seconds(fast, fast_items, args.repeat)
        t_arrays = per_image_seconds(slow, array_items, 1)
        t_lists = per_image_seconds(slow, list_items, 1)
        print(f'{name}: vectorised {t_fast * 1e3:.3f} ms/image ({len(fast_items)} images, best of {args.repeat}); '
              f'decoding its files {decode * 1e3:.2f} ms/image')
        print(f'  per-pixel loops over numpy arrays (upstream style): {t_arrays * 1e3:.1f} ms/image '
              f'({len(array_items)} images) -> ratio {t_arrays / t_fast:.0f}x')
        print(f'  per-pixel loops over Python lists: {t_lists * 1e3:.1f} ms/image -> ratio {t_lists / t_fast:.0f}x')
        print(f'  including decoding (both sides): {(t_arrays + decode) / (t_fast + decode):.0f}x / '
              f'{(t_lists + decode) / (t_fast + decode):.0f}x')


if __name__ == '__main__':
    main()
