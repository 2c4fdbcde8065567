"""The shape of the code: imports run one way (none in a circle, lazy ones included), and what
bench.py and plan.py read of train.py's settings is what train.py runs with."""
import ast
import os

from conftest import REPO, run_inline

MODULES = sorted(name[:-3] for name in os.listdir(REPO) if name.endswith('.py'))


def imports_of(module):
    """The repo's modules that `module` imports anywhere in its source (inside functions too)."""
    with open(os.path.join(REPO, f'{module}.py'), encoding='utf-8') as f:
        tree = ast.parse(f.read())
    names = {alias.name.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    names |= {node.module.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return names & set(MODULES) - {module}


def test_no_module_imports_itself_through_others():
    graph = {module: imports_of(module) for module in MODULES}

    def cycle_from(module, path):
        if module in path:
            return path[path.index(module):] + [module]
        for other in sorted(graph[module]):
            found = cycle_from(other, path + [module])
            if found:
                return found
        return None
    cycles = [cycle_from(module, []) for module in MODULES]
    assert not any(cycles), ' -> '.join(next(c for c in cycles if c))


# what a user runs; everything else is a module the scripts share
SCRIPTS = {'train', 'train_ds', 'sample', 'sample_vlm', 'classify', 'export', 'plan', 'plot', 'bench', 'bench_race',
           'bench_vlm_data', 'bench_vlm_race'}


def test_no_script_is_imported_and_the_bottom_modules_import_only_the_bottom():
    assert not {module: imports_of(module) & SCRIPTS for module in MODULES if imports_of(module) & SCRIPTS}
    bottom = {'configurator': set(), 'hardware': set(), 'runtime': {'configurator'}, 'files': {'configurator'},
              'gpt_data': {'configurator'}, 'model': {'hardware'}, 'gpt_lora': {'configurator', 'model'}}
    assert {module: imports_of(module) for module in bottom} == bottom


def test_what_bench_and_plan_read_of_train_py_is_what_it_runs_with(capsys, monkeypatch):
    from gpt_settings import train_defaults
    monkeypatch.chdir(REPO)
    assert run_inline('train.py', '--help') == (0, '')  # prints the settings train.py built, then exits
    lines = capsys.readouterr().out.split('settings (set with a config file or --key=value):\n')[1].splitlines()
    running = dict((key.strip().lstrip('-'), ast.literal_eval(value))
                   for key, value in (line.split('=', 1) for line in lines))
    assert train_defaults() == running
