"""The method registry: which pretraining methods exist, what they are called, their recipes.

(Not the result registry of runs and scores, which is harness/registry.py.)

A method registers itself by decorating its class with ``@register_method``; the class says its
``name`` (command line, result registry), ``display_name`` (reports), ``config_cls`` (its own
config dataclass, the paper's recipe as defaults) and, for a BCL wrapping, ``base_cls`` (the
registered method it boosts). Methods are found in two places, once per process, on first use:

- every module of this package (methods/*.py): adding a method is adding one file;
- the entry points of the group ``harness.methods`` of every installed distribution, so a lab
  keeps its method in its own package. An entry point names a module (importing it registers
  the classes it decorates) or a Method subclass (registered as it is)::

      [project.entry-points."harness.methods"]
      mymethod = "mylab.mymethod"

Rows of reports follow ``ordered()``: each base method (the paper's in their ``row`` order, then
the others by name), each followed by its BCL wrappings. Everything here is importable without
torch; the method modules themselves load torch, so looking anything up does too.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import pkgutil
import re
import types
import typing
from dataclasses import dataclass

from harness.errors import HarnessError

ENTRY_POINT_GROUP = "harness.methods"
NAME_PATTERN = re.compile(r"[a-z][a-z0-9._-]{0,39}")
# the fields of the flat config every run recorded before methods had their own configs
LEGACY_FLAT_FIELDS = frozenset({
    "name", "batch_size", "epochs", "lr", "final_lr", "momentum", "weight_decay", "warmup_epochs",
    "temperature", "seed", "width", "prune_ratio", "bcl_beta", "bcl_k", "bcl_min_magnitude",
    "bcl_max_magnitude", "bcl_random_magnitude"})


class MethodError(HarnessError, ValueError):
    """An unknown method, a bad --set option, or a method that cannot be registered."""


@dataclass(frozen=True)
class MethodEntry:
    name: str
    display_name: str
    cls: type                 # the Method subclass
    config_cls: type          # its MethodConfig subclass
    base: str | None          # for a BCL wrapping: the name of the method it boosts
    paper: bool               # one of the BCL paper's four methods
    row: int
    source: str               # where it came from: "methods.simclr", "entry point lab = labpkg"

    def default_config(self):
        """The paper's recipe: every field at its default."""
        return self.config_cls(name=self.name)

    def options(self) -> dict[str, object]:
        """This method's own options (what `--set` sets) with their paper values."""
        cfg = self.default_config()
        return {f: getattr(cfg, f) for f in self.config_cls.own_fields()}

    def config_from_dict(self, d: dict, strict: bool = False):
        """A run's recorded method config -> this method's config class. Fields it lacks keep their
        paper values; fields of the old flat config that this method never had are dropped (runs
        recorded before methods had their own configs carry every method's fields). With
        ``strict``, any other unknown field is an error (a resumed run would silently lose it)."""
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(k for k in d if k not in fields and k not in LEGACY_FLAT_FIELDS)
        if strict and unknown:
            raise MethodError(f"the recorded config of a {self.name} run has option(s) {', '.join(unknown)}, "
                              f"which {self.name} ({self.source}) does not have (any more); install the "
                              "version of the method that made the run, or start a new run")
        return dataclasses.replace(self.default_config(), **{k: v for k, v in d.items() if k in fields and
                                                             k != "name"})


_DECLARED: list[tuple[type, str | None]] = []   # (class, entry point) in the order they were declared
_ENTRIES: dict[str, MethodEntry] = {}
_LOADED = False


def register_method(cls: type) -> type:
    """Class decorator: make a Method subclass a registered method (checked when the registry loads)."""
    _DECLARED.append((cls, None))
    if _LOADED:  # declared after the registry loaded (a notebook, a test): register it now
        _add(make_entry(cls, cls.__module__))
    return cls


def _own(cls: type, attr: str, default=None):
    """A class attribute set on the class itself: a subclass of a registered method must give its
    own name and say itself whether it is a paper method."""
    return cls.__dict__.get(attr, default)


def make_entry(cls: type, source: str) -> MethodEntry:
    """Check a method class and describe it; a MethodError says what to fix."""
    from methods.base import Method, MethodConfig

    what = f"{cls.__module__}.{cls.__qualname__}"
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise MethodError(f"{what} ({source}) is not a subclass of methods.base.Method")
    name, display = _own(cls, "name"), _own(cls, "display_name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise MethodError(f"{what} ({source}) needs its own `name`: lower-case letters, digits, '.', '_' "
                          f"or '-', starting with a letter, at most 40 (got {name!r})")
    if not isinstance(display, str) or not display.strip() or not display.isprintable():
        raise MethodError(f"{what} ({source}) needs its own `display_name`, the name shown in reports")
    config_cls = cls.config_cls
    if not (dataclasses.is_dataclass(config_cls) and issubclass(config_cls, MethodConfig)):
        raise MethodError(f"{what}: config_cls must be a dataclass deriving from methods.base.MethodConfig")
    try:
        config_cls(name=name)
    except TypeError as e:
        raise MethodError(f"{what}: every field of {config_cls.__name__} needs a default (the paper's "
                          f"value): {e}") from None
    base = None
    base_cls = getattr(cls, "base_cls", None)
    if base_cls is not None:
        from methods.bcl import BCL, BCLConfig
        if not issubclass(cls, BCL):
            raise MethodError(f"{what}: base_cls is for BCL wrappings (subclasses of methods.bcl.BCL)")
        base = _own(base_cls, "name")
        if issubclass(base_cls, BCL) or base is None:
            raise MethodError(f"{what}: base_cls must be a registered method that is not itself a BCL wrapping")
        mro = config_cls.__mro__
        base_config = base_cls.config_cls
        if not (issubclass(config_cls, BCLConfig) and issubclass(config_cls, base_config)) or \
                mro.index(base_config) > mro.index(BCLConfig):
            raise MethodError(f"{what}: its config must derive from {base_config.__name__} and then "
                              f"methods.bcl.BCLConfig, in that order (class {config_cls.__name__}"
                              f"({base_config.__name__}, BCLConfig)): the base's recipe and options stay its own")
    return MethodEntry(name=name, display_name=display, cls=cls, config_cls=config_cls, base=base,
                       paper=bool(_own(cls, "paper", False)), row=int(cls.row), source=source)


def _add(entry: MethodEntry) -> None:
    old = _ENTRIES.get(entry.name)
    if old is not None and old.cls is not entry.cls:
        raise MethodError(f"two methods are called {entry.name!r}: {old.source} and {entry.source}; "
                          "rename one (or uninstall the package of the other)")
    _ENTRIES[entry.name] = entry


def _entry_points() -> list:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _import_package_modules() -> None:
    import methods
    for info in sorted(pkgutil.iter_modules(methods.__path__), key=lambda i: i.name):
        importlib.import_module(f"methods.{info.name}")


def _load_entry_point(ep) -> None:
    label = f"entry point {ep.name} = {ep.value}"
    before = len(_DECLARED)
    try:
        obj = ep.load()
    except Exception as e:  # a broken plugin is named, not a traceback from deep inside importlib
        dist = getattr(getattr(ep, "dist", None), "name", None)
        raise MethodError(f"method plugin {label}{f' (package {dist})' if dist else ''} failed to load: "
                          f"{e.__class__.__name__}: {e}; fix or uninstall that package") from None
    declared = _DECLARED[before:]
    if isinstance(obj, type):
        if not any(c is obj for c, _ in _DECLARED):
            _DECLARED.append((obj, label))
    elif not declared:
        raise MethodError(f"method plugin {label} registered no method: decorate its class with "
                          "@methods.registry.register_method, or point the entry point at the class")
    for i in range(before, len(_DECLARED)):
        cls, _ = _DECLARED[i]
        _DECLARED[i] = (cls, label)


def load() -> None:
    """Find every method (this package's modules, then installed plugins), once."""
    global _LOADED
    if _LOADED:
        return
    _import_package_modules()
    for ep in _entry_points():
        _load_entry_point(ep)
    entries = [make_entry(cls, source or cls.__module__) for cls, source in _DECLARED]
    for e in entries:
        _add(e)
    for e in entries:
        if e.base is not None and (e.base not in _ENTRIES or _ENTRIES[e.base].cls is not e.cls.base_cls):
            raise MethodError(f"{e.name} ({e.source}) wraps {e.cls.base_cls.__qualname__}, which is not a "
                              "registered method: decorate it with @register_method")
    _LOADED = True


def entries() -> dict[str, MethodEntry]:
    load()
    return _ENTRIES


def ordered(only: typing.Iterable[str] | None = None) -> list[MethodEntry]:
    """Registered methods in report order: each base (by row, then name), then its BCL wrappings."""
    es = entries()
    keep = set(es) if only is None else set(only)
    bases = sorted((e for e in es.values() if e.base is None), key=lambda e: (e.row, e.name))
    out = []
    for b in bases:
        group = [b] + sorted((e for e in es.values() if e.base == b.name), key=lambda e: (e.row, e.name))
        out += [e for e in group if e.name in keep]
    return out


def names() -> list[str]:
    return [e.name for e in ordered()]


def paper_names() -> list[str]:
    return [e.name for e in ordered() if e.paper]


def get(name: str) -> MethodEntry:
    es = entries()
    key = name.lower() if isinstance(name, str) else name
    if key not in es:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(names())}")
    return es[key]


def display_name(name: str) -> str:
    """The report name of a method; a method no installed package registers keeps its own name."""
    e = entries().get(name)
    return e.display_name if e else name


# -- per-method options from the command line ------------------------------------------------

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def parse_value(text: str, kind: object, where: str):
    """`text` as a value of the annotated type `kind` (bool, int, float, str; Optional of one)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        if text.lower() in ("none", "null"):
            return None
        kind = args[0]
    if kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise MethodError(f"{where}: expects true or false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise MethodError(f"{where}: expects an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise MethodError(f"{where}: expects a number, got {text!r}") from None
    if kind is str:
        return text
    raise MethodError(f"{where}: options of type {kind} cannot be set from the command line")


def split_assignments(items: typing.Iterable[str]) -> list[tuple[str, str]]:
    """['a=1', 'b-c=x'] -> [('a', '1'), ('b_c', 'x')]; names may use - for _."""
    out = []
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise MethodError(f"--set {item!r}: write NAME=VALUE, e.g. --set temperature=0.5")
        out.append((name.strip().replace("-", "_"), value.strip()))
    return out


def parse_options(method: str, items: typing.Iterable[str], only_known: bool = False) -> dict[str, object]:
    """`--set NAME=VALUE` items -> {field: typed value} for method `method`, checked against its
    config class. With `only_known`, options this method does not have are skipped (a matrix of
    several methods: each takes the options it has)."""
    entry = get(method)
    hints = typing.get_type_hints(entry.config_cls)
    own = entry.config_cls.own_fields()
    shared = entry.config_cls.shared_fields()
    out: dict[str, object] = {}
    for name, text in split_assignments(items):
        if name in shared:
            raise MethodError(f"--set {name}=...: {name} is part of the shared recipe and has its own option: "
                              f"--{name.replace('_', '-')}" + (" (the method's name is the command's argument)"
                                                                if name == "name" else ""))
        if name not in own:
            if only_known:
                continue
            have = ", ".join(f"{k} (paper: {v!r})" for k, v in entry.options().items()) or "none"
            raise MethodError(f"--set {name}=...: {entry.name} has no option {name!r}; its options: {have}")
        out[name] = parse_value(text, hints[name], f"--set {name}={text}")
    return out

