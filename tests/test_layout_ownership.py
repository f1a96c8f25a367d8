"""One place per name: stage file and folder names are spelled only in ohlora/layout.py.

Every string constant of the code (library, scripts, benchmarks; not the tests, which check the names on their
own) is scanned with ``ast``, leaving out docstrings and argparse help text (``help=``, ``description=``,
``epilog=`` and what a parser is built from). A constant that spells a file name with a stage extension
(``.pth .pt .csv .json .png .jpg .jpeg``), a stage folder (``stylegan/…``, ``synthesize_results`` …) or any other
distinctive name that ``ohlora/layout.py`` spells is a failure naming file and line. The fix is always the same:
add the name (a path property, a name function, a constant or a pattern) to ``ohlora/layout.py`` and use it.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from ohlora.layout import CODE_ROOT

LAYOUT = CODE_ROOT / 'ohlora' / 'layout.py'
SKIPPED_FOLDERS = {'tests', 'build', 'dist', 'venv', '.venv', 'env', 'node_modules', 'site-packages'}

# A file name or a filename pattern/suffix of the kinds the stages write and read.
FILE_NAME = re.compile(r'\.(?:pth|pt|csv|json|png|jpe?g)(?![A-Za-z0-9])', re.IGNORECASE)
# A path under one of the root's stage folders, e.g. 'cnn/models' or 'stylegan/stylegan_model'.
STAGE_FOLDER_PATH = re.compile(r'(?<![A-Za-z0-9_])(?:stylegan|stylegan_modified|cnn|segmentation)/')
# Folder names the stages share; layout.py's other distinctive names are added from its own source below.
KNOWN_NAMES = ('synthesize_results', 'segmentation_results', 'property_score_results', 'stylegan_modified',
               'inference_result', 'final_inference_test', 'models_in_training', 'attribute_direction_samples')
# argparse calls whose positional text is help, and the keywords that hold help text in any call.
PARSER_CALLS = {'make_parser', 'ArgumentParser', 'bench_parser', 'add_argument_group'}
HELP_KEYWORDS = {'help', 'description', 'epilog', 'usage'}


def code_files() -> list[Path]:
    files = []
    for path in sorted(CODE_ROOT.rglob('*.py')):
        parts = path.relative_to(CODE_ROOT).parts
        if path == LAYOUT or any(p in SKIPPED_FOLDERS or p.startswith('.') or p.endswith('.egg-info')
                                 for p in parts[:-1]):
            continue
        files.append(path)
    return files


def string_constants(node: ast.AST):
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            yield child


def layout_names() -> set[str]:
    """The distinctive pieces of every name layout.py spells: path components and f-string parts with an
    underscore and at least six characters (``parsing_``, ``all_scores_v2``, ``generation_settings`` …), from
    its code (not its docstrings, nor dict keys such as the weights keys)."""
    names = set(KNOWN_NAMES)
    tree = ast.parse(LAYOUT.read_text(encoding='utf-8'))
    skipped = exempt_constants(tree)  # docstrings
    skipped.update(id(key) for node in ast.walk(tree) if isinstance(node, ast.Dict) for key in node.keys)  # keys
    for node in string_constants(tree):
        if id(node) in skipped:
            continue
        for piece in re.split(r'[/\s{}().\[\]]+', node.value):
            piece = piece.strip(':,;\'"`*?')
            if len(piece) >= 6 and '_' in piece[1:] and re.fullmatch(r'[A-Za-z0-9_]+', piece):
                names.add(piece)
    return names


def exempt_constants(tree: ast.Module) -> set[int]:
    """ids of the constants that are docstrings or argparse help text."""
    exempt: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                exempt.add(id(first.value))
    help_names: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            if keyword.arg in HELP_KEYWORDS:
                exempt.update(id(c) for c in string_constants(keyword.value))
                help_names.update(n.id for n in ast.walk(keyword.value) if isinstance(n, ast.Name))
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', None)
        if name in PARSER_CALLS:
            for arg in node.args:
                exempt.update(id(c) for c in string_constants(arg))
                help_names.update(n.id for n in ast.walk(arg) if isinstance(n, ast.Name))
    for node in tree.body:  # module-level texts a parser is built from, e.g. EXAMPLES = '''...'''
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in help_names for t in node.targets):
            exempt.update(id(c) for c in string_constants(node.value))
    return exempt


def violations() -> list[str]:
    names = sorted(layout_names(), key=len, reverse=True)
    # A prefix such as 'parsing_' or 'epoch_' names a file only when a number follows (in an f-string the
    # constant part ends there): 'epoch_mean_loss' is a log column, not a folder name.
    alternatives = [re.escape(n) + (r'(?=$|\d)' if n.endswith('_') else '') for n in names]
    name_pattern = re.compile(r'(?<![A-Za-z0-9_])(?:' + '|'.join(alternatives) + r')')
    found = []
    for path in code_files():
        tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
        exempt = exempt_constants(tree)
        for node in string_constants(tree):
            if id(node) in exempt:
                continue
            text = node.value
            match = FILE_NAME.search(text) or STAGE_FOLDER_PATH.search(text) or name_pattern.search(text)
            if match:
                found.append(f'{path.relative_to(CODE_ROOT).as_posix()}:{node.lineno}: {match.group(0)!r} in '
                             f'{text[:70]!r}')
    return found


def test_the_scan_sees_names_that_are_spelled_elsewhere():
    """The rules themselves: what they catch, and the help text and docstrings they leave alone."""
    source = '''
"""Writes all_scores.csv into segmentation/property_score_results/."""
import argparse
EXAMPLES = "python x.py --out stylegan_modified/out.pth"
parser = argparse.ArgumentParser(description="reads synthesize_results/", epilog=EXAMPLES)
parser.add_argument("--weights", help="default: stylegan/stylegan_model.pth")
A = "cnn/models"
B = f"{prefix}_model_{fold}.pt"
C = re.compile(r"(\\d{6})\\.jpg")
D = "final_inference_test_v3"
E = "a parsing map"
def f():
    """docstring naming face_000000.png"""
    return path.suffix == ".png"
'''
    tree = ast.parse(source)
    exempt = exempt_constants(tree)
    pattern = re.compile(r'(?<![A-Za-z0-9_])(?:final_inference_test)')
    flagged = sorted(c.lineno for c in string_constants(tree) if id(c) not in exempt and (
        FILE_NAME.search(c.value) or STAGE_FOLDER_PATH.search(c.value) or pattern.search(c.value)))
    assert flagged == [7, 8, 9, 10, 14]
    assert {'parsing_', 'all_scores_v2', 'synthesize_results', 'generation_settings'} <= layout_names()


def test_stage_file_and_folder_names_are_spelled_only_in_layout():
    found = violations()
    assert not found, ('stage file or folder names spelled outside ohlora/layout.py; move each to '
                       'ohlora/layout.py (a Layout path, a name function, a constant or a pattern) and use it '
                       'from there:\n  ' + '\n  '.join(found))
