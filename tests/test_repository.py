"""The repository itself: declared dependencies agree, and the test data is small, described and intact."""
import hashlib
import json
import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

from ohlora.layout import CODE_ROOT

MAX_FILE_BYTES = 5 * 2 ** 20


def requirement_lines(path) -> list[str]:
    """The requirement specifiers of a requirements file: no comments, no pip options (``-e .``, ``-r``)."""
    lines = (line.split('#', 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith('-')]


def test_requirements_txt_and_pyproject_declare_the_same_dependencies():
    declared = tomllib.loads((CODE_ROOT / 'pyproject.toml').read_text())['project']['dependencies']
    listed = requirement_lines(CODE_ROOT / 'requirements.txt')
    assert sorted(listed) == sorted(declared)
    assert len(set(listed)) == len(listed)
    assert 'facenet-pytorch==2.5.3' in listed  # 2.6.0 pins torch < 2.3
    assert '-e .' in (CODE_ROOT / 'requirements.txt').read_text().splitlines()  # the project itself, editable


def data_files(reference_dir):
    return sorted(p for p in reference_dir.rglob('*') if p.is_file() and '__pycache__' not in p.parts)


def test_test_data_files_are_small_and_each_is_described(reference_dir):
    files = data_files(reference_dir)
    assert len(files) > 100
    too_big = [p.name for p in files if p.stat().st_size > MAX_FILE_BYTES]
    assert not too_big
    readme = reference_dir / 'README.md'
    # A file is described when the README names it (by its path or the end of its path) or, below the three
    # reference folders (genforce/, facexformer/, ohlora/), its folder.
    names = set(re.findall(r'`([^`\s]+)`', readme.read_text()))
    undescribed = []
    for path in files:
        relative = path.relative_to(reference_dir).as_posix()
        folder = path.parent.relative_to(reference_dir).as_posix() + '/'
        by_folder = folder.count('/') >= 2 and any(name.endswith('/') and f'/{folder}'.endswith(f'/{name}')
                                                   for name in names)
        if path != readme and not by_folder and not any(f'/{relative}'.endswith(f'/{name}') for name in names):
            undescribed.append(relative)
    assert not undescribed, undescribed


def test_upstream_data_files_are_byte_for_byte_copies(reference_dir):
    """The CSVs under ohlora/data/ against the SHA-256 that MANIFEST.json records for the upstream files."""
    folder = reference_dir / 'ohlora' / 'data'
    manifest = {entry['file']: entry['sha256'] for entry in json.loads((folder / 'MANIFEST.json').read_text())['files']}
    present = [p.relative_to(folder).as_posix() for p in folder.rglob('*.csv')]
    assert len(present) == 6
    for relative in present:
        assert hashlib.sha256((folder / relative).read_bytes()).hexdigest() == manifest[relative], relative


def marked_table(text: str) -> str:
    """The benchmark table between the ``<!-- benchmark-table`` markers."""
    found = re.search(r'<!-- benchmark-table[^\n]*-->\n(.*?)<!-- /benchmark-table -->', text, re.S)
    assert found, 'no <!-- benchmark-table --> ... <!-- /benchmark-table --> block'
    return found.group(1)


def test_the_readme_and_docs_benchmark_tables_are_one_table_naming_every_bench():
    readme = marked_table((CODE_ROOT / 'README.md').read_text())
    docs = marked_table((CODE_ROOT / 'docs' / 'benchmarks.md').read_text())
    assert readme == docs
    scripts = sorted(p.name for p in (CODE_ROOT / 'bench').glob('bench_*.py') if p.name != 'bench_common.py')
    named = sorted(set(re.findall(r'`bench/(bench_\w+\.py)`', readme)))
    assert named == scripts
    assert 'to be measured' not in readme


def test_the_readme_links_every_docs_page_and_the_links_resolve():
    readme = (CODE_ROOT / 'README.md').read_text()
    links = set(re.findall(r'\]\((docs/[^)#]+)', readme))
    pages = {f'docs/{p.name}' for p in (CODE_ROOT / 'docs').glob('*.md')}
    assert pages <= links, sorted(pages - links)
    assert all((CODE_ROOT / link).is_file() for link in links), sorted(links)
    for page in (CODE_ROOT / 'docs').glob('*.md'):  # links between the pages resolve too
        for link in re.findall(r'\]\(([\w.-]+\.md)', page.read_text()):
            assert (page.parent / link).is_file(), f'{page.name} links {link}'


def test_ci_runs_exactly_the_readme_test_command():
    readme = (CODE_ROOT / 'README.md').read_text()
    command = re.search(r'## Tests\n\n```bash\n(.*?)\n```', readme, re.S).group(1).strip()
    ci = (CODE_ROOT / '.ci' / 'run').read_text().strip().splitlines()
    assert ci[-1] == command
