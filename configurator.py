"""
Poor man's configurator, as in nanoGPT, but strict. Used by train.py, sample.py and plan.py:

    python train.py config/override_file.py --batch_size=32

A bare argument is a Python file exec'd over the script's settings (config files are code: run only
ones you trust). `--key=value` sets one setting; the value is read with ast.literal_eval (never
evaluated as code) and must have the default's type (an int where a float is expected is fine).
Unknown keys, wrong types and missing files raise ConfigError with one line that says the fix.
"""
import ast
import difflib
import os


class ConfigError(Exception):
    pass


def configure(args, config):
    """Apply config files and --key=value overrides in `args` to the dict `config`, in order.
    Returns the set of keys that were set, so a script can tell a default from a user's choice."""
    changed = set()
    for arg in args:
        if arg in ("-h", "--help"):
            print("settings (set with a config file or --key=value):")
            print("\n".join(f"  --{k}={v!r}" for k, v in config.items()))
            raise SystemExit(0)
        if not arg.startswith("--"):
            changed |= apply_file(arg, config)
            continue
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"'{arg}' has no value: write --{key}=VALUE")
        check_key(key, config, f"--{key}")
        config[key] = parse_value(key, raw, config[key])
        print(f"Overriding: {key} = {config[key]!r}")
        changed.add(key)
    return changed


def apply_file(path, config):
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found (settings go as --key=value, files as a path)")
    print(f"Overriding config with {path}:")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text: save it as UTF-8") from None
    print(source)
    namespace = dict(config)
    try:
        tree = ast.parse(source, path)
        exec(compile(tree, path, "exec"), namespace)
    except Exception as e:
        raise ConfigError(f"config file '{path}' failed: {type(e).__name__}: {e}") from None
    assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    changed = set()
    for key in sorted(assigned):
        value = namespace.get(key)
        if key.startswith("_") or key not in namespace or not isinstance(value, (int, float, str, bool, type(None))):
            continue  # private helpers of the config file itself
        check_key(key, config, f"{key} in {path}")
        check_type(key, value, config[key], where=path)
        config[key] = value
        changed.add(key)
    return changed


def check_key(key, config, where):
    if key not in config:
        close = difflib.get_close_matches(key, list(config), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see the settings at the top of the script"
        raise ConfigError(f"unknown setting {where}{hint}")


def parse_value(key, raw, default):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # plain strings need no quotes: --init_from=resume
    if isinstance(default, str) and not isinstance(value, str):
        value = raw  # --wandb_run_name=2024 stays the string '2024'
    check_type(key, value, default, where=f"--{key}")
    return value


def check_type(key, value, default, where):
    if default is None or type(value) is type(default):
        return
    if type(default) is float and type(value) is int:
        return
    raise ConfigError(f"{where}: {key} must be {type(default).__name__} like the default {default!r}, "
                      f"got {type(value).__name__} {value!r}")


def read_defaults(script_path):
    """A script's settings, read without running it: the first run of plain top-level assignments
    (`name = constant`, arithmetic like 5 * 8 too), which ends where the script's code begins."""
    with open(script_path) as f:
        tree = ast.parse(f.read(), script_path)
    plain = (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop, ast.expr_context)
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and all(isinstance(n, plain) for n in ast.walk(node.value)):
            defaults[node.targets[0].id] = eval(compile(ast.Expression(node.value), script_path, "eval"), {"__builtins__": {}})
        elif defaults:
            break
    return defaults
