import pytest

from megaseek.distributed.topology import Topology


def test_rank_coord_roundtrip_and_tp_innermost():
    t = Topology(tp=2, pp=2, dp=2)
    assert t.world_size == 8
    for r in range(8):
        c = t.coord(r)
        assert t.rank(c.pp, c.dp, c.tp) == r
    assert t.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]  # consecutive ranks: one node
    assert t.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert t.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert t.mp_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_groups_partition_the_world():
    t = Topology(tp=2, pp=3, dp=4)
    for groups in (t.tp_groups(), t.dp_groups(), t.pp_groups(), t.mp_groups()):
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(24))
    assert t.group_of(13, "tp") == [12, 13]


def test_from_world_refuses_non_dividing_layout():
    assert Topology.from_world(8, tp=2, pp=2).dp == 2
    with pytest.raises(ValueError, match="not divisible by parallel.tp"):
        Topology.from_world(6, tp=4, pp=1)
    with pytest.raises(ValueError):
        Topology(tp=0)
