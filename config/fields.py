"""How a configuration field declares its command-line flag, once, beside the field: its help, type, choices,
other spellings, and whether it decides a run's result (a resumed run and a sweep's skipping compare those)."""
import dataclasses
import json

# A field that decides a run's result, but which a resumed run may change: --epochs (train on past the saved epoch).
RESUMABLE = "resumable"


def flag(default=None, help=None, *, names=(), type=None, choices=None, nargs=None, const=None, metavar=None,
         switch=False, append=False, required=False, exclusive=None, positional=False, decides=True):
    """A dataclass field that is also a flag: `--<field name>` (and `names`, other spellings), argparse's `type`,
    `choices`, `nargs`, `const`, `metavar`; `switch` is a store_true flag, `append` a repeatable one, `exclusive` the
    name of a group of flags of which one at most may be given, `positional` an argument without a dash. `decides`: True if the value decides the run's
    result, False if it only says where and how the run goes, RESUMABLE for --epochs."""
    meta = {"help": help, "names": tuple(names), "type": type, "choices": choices, "nargs": nargs, "const": const,
            "metavar": metavar, "switch": switch, "append": append, "required": required, "exclusive": exclusive,
            "positional": positional, "decides": decides}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def is_section(f):
    """A field of a subcommand's configuration that holds a section (a dataclass) rather than a flag's value."""
    return dataclasses.is_dataclass(f.type) if isinstance(f.type, type) else False


def class_defaults(cls):
    """[(section name or None, field, default)] of a subcommand's configuration class, before any default that
    follows another flag is filled in: what its flags default to."""
    out = []
    for f in dataclasses.fields(cls):
        if is_section(f):
            out += [(f.name, g, getattr(f.default, g.name)) for g in dataclasses.fields(f.default)]
        else:
            out.append((None, f, f.default if f.default is not dataclasses.MISSING else f.default_factory()))
    return out


def build(cls, values):
    """The configuration `cls` of flag values ({field name: value}; a list is kept as a tuple), each section made
    from its default with the values it holds; a field `values` lacks keeps its default, and a None a default that
    follows another flag (filled in as the configuration is made)."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if is_section(f):
            mine = {g.name: values[g.name] for g in dataclasses.fields(f.default) if g.name in values}
            kwargs[f.name] = dataclasses.replace(f.default, **mine)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def config_from_values(cls, values):
    """A `cls` configuration from flat values as a record or a resume state holds them. A None is left out, so
    that the field takes its default (schema 1 stored a flag not given as None) or one that follows another flag."""
    return build(cls, {k: v for k, v in values.items() if v is not None})


def section_fields(config):
    """[(section name or None, field, value)] of a configuration: the flag fields of each section, then the
    configuration's own flag fields."""
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if is_section(f):
            out += [(f.name, g, getattr(value, g.name)) for g in dataclasses.fields(value)]
        else:
            out.append((None, f, value))
    return out


def plain(value):
    """A value as JSON writes and reads it back (tuples as lists), so that a value read from a record compares
    equal to the same value made here."""
    return json.loads(json.dumps(value))


def flat_values(config):
    """{field name: value} of every flag field of a configuration (each name is one flag: unique in it)."""
    return {f.name: value for _, f, value in section_fields(config)}


def deciding_values(config, *, resuming=False):
    """The values that decide a run's result, as JSON reads them: a sweep skips a run logged with the same ones,
    and (`resuming`: without --epochs) a resumed run must have those of the run it continues."""
    kept = (True,) if resuming else (True, RESUMABLE)
    return plain({f.name: value for _, f, value in section_fields(config) if f.metadata.get("decides", True) in kept})
