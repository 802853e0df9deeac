"""The one-way layers (issue 21): the model layer and rundir import no wing, and nothing imports in
a cycle (tools/import_graph.py reads every tracked module with ast)."""
from tools import import_graph


def test_the_model_layer_imports_no_wing_and_nothing_cycles(capsys):
    assert import_graph.main([]) == 0, capsys.readouterr().out


def test_the_rule_can_fail():
    g = {"hdovd": {"knowledge.official"}, "knowledge.official": set()}
    assert import_graph.violations(g) == [("hdovd", "knowledge.official")]
    try:
        import_graph.depth({"a": {"b"}, "b": {"a"}})
    except ValueError as e:
        assert "a -> b -> a" in str(e)
    else:
        raise AssertionError("a cycle was not found")
