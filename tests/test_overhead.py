"""`dynconv overhead` on CPU: every op and floor is timed with the launches stubbed, and the stubs
are undone afterwards."""
from dynconv import overhead
from dynconv.kernels import _launch, configs
from dynconv.kernels._launch import Launch


def test_overhead_times_every_op_and_restores_what_it_stubbed(capsys):
    launch, active_device, interpreted = Launch.__call__, configs._active_device, _launch._INTERPRETED
    assert overhead.main(["--device", "cpu", "--calls", "2", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:26].strip(): line[26:].split() for line in lines[2:]}
    assert set(rows) == {"involution", "dynamic_dwconv2d", "expert_conv2d", "involution_fused",
                         "floor: custom_op", "floor: autograd.Function"}
    assert all(len(times) == 3 and all(float(t) > 0 for t in times) for times in rows.values())
    assert Launch.__call__ is launch and configs._active_device is active_device
    assert _launch._INTERPRETED is interpreted
