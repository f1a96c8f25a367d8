"""The evaluation's tables and texts: per_image.csv, per_z.csv, summary.json and summary.md."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ohlora.layout import PROPERTY_NAMES, AttributeControlFolder
from stylegan_modified.evaluation_figures import EvaluationFigures, measured_rows

# DIRECTIONS.md / PIPELINE.md §7.4: the upstream's own figures, for comparison (random z unless stated).
UPSTREAM_REFERENCE = {
    'v3_shipped_z (epoch 5, z 21; near the encoder output, property CNN)': {
        'r': {'eyes': 0.8928, 'mouth': 0.8582, 'pose': 0.9318},
        'mae': {'eyes': 0.9342, 'mouth': 0.4452, 'pose': 1.2365}},
    'v3 per-epoch tests (35 epochs x 30 z near the encoder output)': {'upstream_v3_pass_rate': 0.09},
    'VectorFind-v7 (w directions, adopted)': {'mean_abs_r': {'eyes': 0.902, 'mouth': 0.867, 'pose': 0.795},
                                              'strict_pass_rate': 0.024},
    'VectorFind-v8': {'mean_abs_r': {'eyes': 0.874, 'mouth': 0.847, 'pose': 0.874}, 'strict_pass_rate': 0.0245},
    'project goal': {'mean_r_min': 0.95, 'mae_max': 0.5, 'strict_pass_rate_min': 0.5},
}
RULE_NAMES = {'upstream_v3': 'upstream v3 rule', 'strict': 'strict rule'}


def json_safe(value):
    """Plain JSON types; NaN and infinities become null (the JSON standard has no NaN)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def per_image_table(folder: AttributeControlFolder, requested: np.ndarray, measured: np.ndarray,
                    judged: dict[str, np.ndarray] | None, identity: np.ndarray | None) -> pd.DataFrame:
    num_z, num_labels = measured.shape[:2]
    z_index = np.repeat(np.arange(num_z), num_labels)
    label_index = np.tile(np.arange(num_labels), num_z)
    table = {'z_index': z_index, 'label_index': label_index,
             'image': [folder.image(z, k).relative_to(folder.folder).as_posix() for z, k in zip(z_index, label_index)]}
    for k, name in enumerate(PROPERTY_NAMES):
        table[f'requested_{name}'] = np.tile(requested[:, k], num_z)
    for k, name in enumerate(PROPERTY_NAMES):
        table[f'measured_{name}'] = measured[:, :, k].reshape(-1)
    table['measured'] = measured_rows(measured).reshape(-1).astype(int)
    for prop, values in (judged or {}).items():
        table[prop] = values.reshape(-1)
    if identity is not None:
        table['identity'] = identity.reshape(-1)
    return pd.DataFrame(table)


def per_z_table(figures: EvaluationFigures) -> pd.DataFrame:
    table = {'z_index': np.arange(len(figures.enough)), 'measured_images': figures.measured_images}
    for k, attribute in enumerate(figures.swept):
        r = figures.metrics.get('r', attribute)
        table[f'r_{attribute}'] = np.where(figures.enough, r, np.nan)
        table[f'abs_r_{attribute}'] = np.where(figures.enough, np.abs(r), np.nan)
        table[f'mae_{attribute}'] = figures.metrics.get('mae', attribute)
        table[f'gain_{attribute}'] = figures.slopes[:, k, PROPERTY_NAMES.index(attribute)]
    for key, passed in figures.passes.items():
        if passed is not None:
            table[f'pass_{key}'] = passed.astype(int)
    if figures.identity is not None:
        table['identity'] = figures.identity
    for name, values in (figures.shares or {}).items():
        table[f'{name}_share'] = values
    return pd.DataFrame(table)


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return 'n/a'
    return f'{round(value, digits) + 0.0:.{digits}f}'  # + 0.0: no '-0.00'


def summary_markdown(summary: dict) -> str:
    """A short table a user can paste: r, |r|, MAE per attribute, pass rates, leakage, shares, identity."""
    run = summary['run']
    lines = [f"### Attribute control: {run['model']}, measured by {run['measure']} (algorithm {run['algorithm']})",
             '',
             f"{summary['num_z']} z ({run['z_source']}) x {run['labels_per_z']} labels = {run['images']} images, "
             f"{summary['measured_images']} measured.",
             '',
             '| attribute | mean r | median r | p10 r | p90 r | mean \\|r\\| | mean MAE | median MAE |',
             '|---|---|---|---|---|---|---|---|']
    for attribute, figures in summary['attributes'].items():
        r, abs_r, mae = figures['r'] or {}, figures['abs_r'] or {}, figures['mae'] or {}
        lines.append(f"| {attribute} | {_f(r.get('mean'))} | {_f(r.get('median'))} | {_f(r.get('p10'))} | "
                     f"{_f(r.get('p90'))} | {_f(abs_r.get('mean'))} | {_f(mae.get('mean'))} | "
                     f"{_f(mae.get('median'))} |")
    lines.append('')
    rates = []
    for key, rule in summary['pass_rules'].items():
        if rule['passed'] is None:
            rates.append(f"{RULE_NAMES[key]}: not applicable ({rule['note']})")
        else:
            rates.append(f"{RULE_NAMES[key]} ({', '.join(rule['checked'])}): {rule['passed']}/{summary['num_z']} z "
                         f"({100 * rule['rate']:.1f} %)")
    lines.append('Pass rates: ' + '; '.join(rates) + '.')
    leakage = summary['leakage']
    lines += ['', 'Leakage (mean slope of the measured attribute per unit requested; own attribute = gain):', '',
              '| requested \\ measured | ' + ' | '.join(leakage['measured']) + ' |',
              '|---|' + '---|' * len(leakage['measured'])]
    for attribute, row in zip(leakage['requested'], leakage['slope_mean']):
        lines.append(f'| {attribute} | ' + ' | '.join(_f(v, 2) for v in row) + ' |')
    lines.append('')
    shares = summary['shares']
    if shares is not None:
        lines.append(f"Judged female (gender >= 0.7): {100 * shares['female']:.1f} % of images; good quality "
                     f"(>= 0.9): {100 * shares['good_quality']:.1f} %.")
    identity = summary['identity']
    if identity is not None:
        lines.append(f"Identity (mean cosine similarity of face embeddings within a z): mean {_f(identity['mean'])}, "
                     f"median {_f(identity['median'])}, p10 {_f(identity['p10'])}.")
    for note in summary['left_out']:
        lines.append(f'Left out: {note}')
    return '\n'.join(lines) + '\n'


def console_lines(summary: dict, folder: AttributeControlFolder) -> list[str]:
    """What the script prints: one line per attribute, the pass rates and where the files are."""
    lines = []
    for attribute, figures in summary['attributes'].items():
        r, mae = figures['r'] or {}, figures['mae'] or {}
        lines.append(f"{attribute}: mean r {_f(r.get('mean'))} (median {_f(r.get('median'))}), "
                     f"mean MAE {_f(mae.get('mean'))}")
    for key, rule in summary['pass_rules'].items():
        if rule['passed'] is not None:
            lines.append(f"{RULE_NAMES[key]}: {rule['passed']}/{summary['num_z']} z pass ({100 * rule['rate']:.1f} %)")
    if summary['shares'] is not None:
        lines.append(f"female {100 * summary['shares']['female']:.1f} %, good quality "
                     f"{100 * summary['shares']['good_quality']:.1f} %")
    if summary['identity'] is not None:
        lines.append(f"identity (mean cosine within a z): {_f(summary['identity']['mean'])}")
    lines += [f'left out: {note}' for note in summary['left_out']]
    lines.append(f'summary: {folder.summary_md} (all figures: {folder.summary_json.name})')
    return lines
