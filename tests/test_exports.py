"""The public face of the packages: what __all__ promises is importable, and nothing private leaks."""

import runtime
import transports.tcp


def test_runtime_all_is_importable_and_public():
    """Every name in runtime.__all__ exists and none is private."""
    for name in runtime.__all__:
        assert hasattr(runtime, name), name
        assert not name.startswith("_"), name
    assert sorted(runtime.__all__) == sorted(set(runtime.__all__))


def test_public_objects_are_reexported_from_private_modules():
    """Public classes live in private modules and are re-exported, so the layout can change freely."""
    assert runtime.Worker.__module__ == "runtime._worker"
    assert set(transports.tcp.__all__) == {
        "ClientExchange",
        "ClientStream",
        "TcpClient",
        "TcpPool",
        "TcpTransport",
    }
