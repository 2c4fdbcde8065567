"""
Poor man's configurator, as in nanoGPT, but strict. Used by every script:

    python train.py config/override_file.py --batch_size=32

A bare argument is a Python file exec'd over the script's settings (config files are code: run only
ones you trust). `--key=value` sets one setting; the value is read with ast.literal_eval (never
evaluated as code) and must have the default's type (an int where a float is expected is fine).
Unknown keys, wrong types and missing files raise UserError with one line that says the fix.

UserError is the one exception for a mistake a user can fix, wherever it is raised: each script turns
it into its one line on stderr (one_line_errors), never a traceback. A script's preamble is one call:

    config, explicit_keys = settings(globals())  # config files and --key=value over the globals above
"""
import ast
import difflib
import os
import re
import sys


class UserError(Exception):
    """A mistake the user can fix: its message names the problem and the fix, in one line."""


def one_line_errors():
    """From here on an uncaught UserError ends the process with 'error: <message>' on stderr and exit
    status 1, not a traceback. Under DDP only rank 0 says it; the other ranks exit quietly."""
    previous = sys.excepthook
    if getattr(previous, "one_line_errors", False):  # installed already (a test runs many scripts in one process)
        return

    def hook(kind, error, traceback):
        if not issubclass(kind, UserError):
            return previous(kind, error, traceback)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
    hook.one_line_errors = True
    sys.excepthook = hook


def settings(namespace, argv=None):
    """A script's preamble: its settings (the plain int, float, bool and str globals in namespace), with
    the config files and --key=value of argv (default sys.argv) applied and written back into namespace.
    Returns (the settings as a dict, the keys the user set). UserError is one line from here on."""
    one_line_errors()
    config = {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
    explicit_keys = configure(sys.argv[1:] if argv is None else argv, config)
    namespace.update(config)
    return config, explicit_keys


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
            raise UserError(f"'{arg}' has no value: write --{key}=VALUE")
        check_key(key, config, f"--{key}")
        config[key] = parse_value(key, raw, config[key])
        print(f"Overriding: {key} = {config[key]!r}")
        changed.add(key)
    return changed


def apply_file(path, config):
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' not found (settings go as --key=value, files as a path)")
    print(f"Overriding config with {path}:")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except UnicodeDecodeError:
        raise UserError(f"config file '{path}' is not UTF-8 text: save it as UTF-8") from None
    print(source)
    namespace = dict(config)
    try:
        tree = ast.parse(source, path)
        exec(compile(tree, path, "exec"), namespace)
    except Exception as e:
        raise UserError(f"config file '{path}' failed: {type(e).__name__}: {e}") from None
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
        raise UserError(f"unknown setting {where}{hint}")


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
    raise UserError(f"{where}: {key} must be {type(default).__name__} like the default {default!r}, "
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
            defaults[node.targets[0].id] = eval(compile(ast.Expression(node.value), script_path, "eval"),
                                                {"__builtins__": {}})
        elif defaults:
            break
    return defaults


# -----------------------------------------------------------------------------
# ranges: every numeric setting's valid values, checked once before any expensive step

INTERVAL = re.compile(r"([\[(])\s*(-?[\w.]+)\s*,\s*(-?[\w.]+)\s*([\])])")


def in_interval(value, interval):
    """Is value a number in an interval written as in maths: '[1, inf)', '(0, 1]', '[0, 1)'?
    (NaN and infinities fail every comparison that matters, so they are out.)"""
    left, low, high, right = INTERVAL.fullmatch(interval).groups()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    low, high = float(low), float(high)
    return (value >= low if left == "[" else value > low) and (value <= high if right == "]" else value < high)


def check_ranges(values, ranges, flag=lambda name: name):
    """UserError for the first setting outside its interval. ranges: name -> '[1, inf)' etc.; a value of
    None passes (it means 'off'). flag turns a name into what the user typed (--keep-last)."""
    for name, interval in ranges.items():
        value = values[name]
        if value is not None and not in_interval(value, interval):
            raise UserError(f"{flag(name)} must be in {interval}, got {value!r}")
