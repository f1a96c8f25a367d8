"""Measure what a generator really controls: request attribute values, re-measure them, report r, MAE and more.

For every z (random, or rows of a CSV) the generator draws one image per label of a grid (default: upstream's v3
test grid, eyes {-1.8, 1.8} x mouth {-1.2, -0.6, 0, 0.8, 1.6} x pose {-1.2, 0, 1.2, 2.4, 3.6} = 50 labels). Each
image is measured in the model's own label space: the property CNN (v2/v3 default) or MTCNN + FaceXFormer +
property-score algorithm 1/2 + the stage-4 statistics (v1 default; the independent check for v3). Reported per
z and attribute: Pearson r (0 on zero variance), |r| and MAE, the upstream v3 pass rule and the strict rule,
their distributions and pass rates; the leakage slopes (how every measured attribute moves per unit of each
requested one); the shares still judged female / good quality (stage-2 ensembles); identity (mean cosine
similarity of face embeddings within a z). Everything goes into one run folder (--outdir): a summary (JSON and
a pasteable Markdown table), per-image and per-z tables, plots and one labelled sweep grid per z; a rerun
resumes, and a folder made with other settings is refused. --compat is not offered: nothing here has an upstream
behaviour to switch.
"""
from __future__ import annotations

from ohlora.cli import add_common_options, make_parser, positive_int, request_from, run
from ohlora.errors import PipelineError
from ohlora.layout import Layout
from ohlora.weights import SOURCES
from stylegan_modified.attribute_measurers import MEASURES
from stylegan_modified.generator_registry import GENERATORS
from stylegan_modified.evaluation_setup import DEFAULT_NUM, EvaluationOptions, run_evaluation

EXAMPLES = '''
  # the published v3 with the published property CNN: 100 random z x 50 labels (both downloaded if absent)
  python stylegan_and_segmentation/evaluate_attribute_control.py
  # the same, measured independently by face parsing (needs stage 4's all_scores_v2_stats.json, or --stats)
  python stylegan_and_segmentation/evaluate_attribute_control.py --measure parsing --device cuda --batch-size 32
  # the z upstream shipped, then your own v3 checkpoint on 500 z
  python stylegan_and_segmentation/evaluate_attribute_control.py --z-csv stylegan_modified/test_z_vector_0005.csv
  python stylegan_and_segmentation/evaluate_attribute_control.py --weights my_v3.pth --num 500 --outdir runs/my_v3
  # v1 (algorithm-1 labels, measured by parsing), a mouth-only grid
  python stylegan_and_segmentation/evaluate_attribute_control.py --model v1 --grid mouth=-1,0,1,2,3
  # the attribute directions of find_attribute_directions.py (the GenForce base generator it names)
  python stylegan_and_segmentation/evaluate_attribute_control.py --model directions
  # a custom grid: the first --grid varies slowest; an attribute with one value is held there
  python stylegan_and_segmentation/evaluate_attribute_control.py --grid eyes=-1.8,1.8 --grid pose=-1.2,0,1.2
'''


def one_line_error(message: str):
    """argparse's errors as one 'error:' line with exit status 2, like every error found later."""
    raise PipelineError(message)


ROOT = Layout('<root>')  # the default paths for --help, spelled by the Layout


def build_parser():
    parser = make_parser(__doc__, EXAMPLES)
    parser.error = one_line_error
    models = '; '.join(f'{name}: {entry.help}' for name, entry in GENERATORS.items())
    parser.add_argument('--model', choices=list(GENERATORS), default='v3', help=f'generator (default v3). {models}')
    parser.add_argument('--weights', default=None, metavar='PATH',
                        help=f'generator file (default: the published file in {ROOT.fine_tuned_dir}, downloaded '
                             'if absent; v2: the file v2 training wrote; directions: the base generator)')
    parser.add_argument('--directions', default=None, metavar='FILE',
                        help=f'--model directions: the directions file (default: {ROOT.attribute_directions})')
    z = parser.add_argument_group('z vectors')
    z.add_argument('--num', type=positive_int, default=None,
                   help=f'random z ~ N(0, I), z_i drawn from (--seed, i) (default: {DEFAULT_NUM})')
    z.add_argument('--z-csv', default=None, metavar='CSV',
                   help="CSV with the header 0,1,...,n-1 and one z per row (e.g. the shipped test_z_vector_0005.csv)")
    parser.add_argument('--grid', action='append', default=None, metavar='ATTR=V1,V2,...',
                        help='label grid per z, repeatable; the first varies slowest, unlisted attributes are 0 '
                             '(default: upstream\'s v3 test grid mouth x eyes x pose, 50 labels)')
    measure = parser.add_argument_group('measurement (in the model\'s label space)')
    measure.add_argument('--measure', choices=MEASURES, default=None,
                         help='property-cnn (default for v2/v3) or parsing (default for v1)')
    measure.add_argument('--property-cnn', default=None, metavar='PATH',
                         help=f'property-CNN file (default: {SOURCES["v2_property_cnn"].destination(ROOT)}, '
                              'downloaded if absent)')
    measure.add_argument('--algorithm', type=int, choices=(1, 2), default=None,
                         help='parsing: property-score algorithm (default: the model\'s, 1 for v1, 2 for v2/v3)')
    measure.add_argument('--stats', default=None, metavar='JSON',
                         help=f'parsing: stage-4 statistics (default: {ROOT.property_scores_stats(1)} for '
                              f'algorithm 1, {ROOT.property_scores_stats(2).name} beside it for 2)')
    measure.add_argument('--facexformer', default=None, metavar='PATH',
                         help=f'parsing: FaceXFormer checkpoint (default: {ROOT.facexformer_weights}, downloaded '
                              'if absent)')
    extra = parser.add_argument_group('leakage judges and identity (left out with one line when unavailable)')
    extra.add_argument('--cnn-weights', default=None, metavar='DIR',
                       help=f'folder with the ten stage-2 fold files {ROOT.cnn_model("gender", 0).name} ... '
                            f'{ROOT.cnn_model("quality", 4).name} (default: {ROOT.cnn_models_dir})')
    extra.add_argument('--no-shares', action='store_true', help='skip the female / good-quality shares')
    extra.add_argument('--identity-weights', default=None, metavar='PATH',
                       help=f'facenet-pytorch InceptionResnetV1 state_dict (default: {ROOT.identity_weights}, '
                            'downloaded if absent)')
    extra.add_argument('--no-identity', action='store_true', help='skip the identity figure')
    parser.add_argument('--outdir', default=None, metavar='DIR',
                        help=f'run folder (default: {ROOT.attribute_control_dir("<model>", "<measure>")}, '
                             'measure: property-cnn, parsing-alg1 or parsing-alg2)')
    add_common_options(parser, batch_size=8, compat=False, batch_size_help='images per generator / measurer batch')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    result = run_evaluation(request_from(EvaluationOptions, args))
    for line in result.report_lines():
        print(line)


if __name__ == '__main__':
    run(main)
