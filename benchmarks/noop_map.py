"""The no-op map used by the throughput benchmarks (importable by every peer)."""


def noop(item):
    return None


def sleep_1ms(item):
    import time

    time.sleep(0.001)
    return None
