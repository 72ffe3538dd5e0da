"""The maps the throughput benchmarks run (importable by every peer).

``small_dict`` is the default: a realistic result costs more to record than
``None`` (the one result the worker need not encode), and users' maps return
ids, short strings and small dicts, not ``None``.
"""


def noop(item):
    return None


def item_id(item):
    return item["id"]


def short_str(item):
    return f"done-{item['id']}"


def small_dict(item):
    return {"id": item["id"], "ok": True, "label": "x"}


def identity(item):
    return item


def always_raises(item):
    raise ValueError(f"cannot process item {item['id']}")


def sleep_1ms(item):
    import time

    time.sleep(0.001)
    return None


RESULTS = {"none": noop, "int": item_id, "str": short_str, "dict": small_dict}
