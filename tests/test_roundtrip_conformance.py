"""ONNX round-trip conformance: every onnx test model onnxruntime can run gives the same
outputs, bit for bit, after a qcompile import and export; and every one of them, runnable
or not, comes back as the same ModelProto. The harness is tests/roundtrip_cases.py
(`python tests/roundtrip_cases.py` prints the counts); docs/roundtrip.md explains it.
"""
from typing import Dict

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from roundtrip_cases import (
    KNOWN_REASON_KINDS,
    Case,
    all_cases,
    check_structure,
    compare_outputs,
    reason_kind,
    run_case,
    structure_difference,
)

CASES = all_cases()

# Cases that cannot pass yet: {case id: text their failure reason contains}. The test
# asserts each still fails that way, so a fix shows up as a failure to remove here.
KNOWN_FAILURES: Dict[str, str] = {}

# Cases onnxruntime must be able to run: if these are skipped, the harness is broken
# (an input it cannot feed, a session option onnxruntime refuses), not the round trip.
MUST_RUN = [
    "node/test_abs", "node/test_if", "node/test_loop11", "node/test_scan9_sum",  # control flow
    "node/test_sequence_map_add_2_sequences", "node/test_identity_opt",  # sequence and optional inputs
    "node/test_cast_FLOAT_to_BFLOAT16",  # an output numpy cannot hold
    "pytorch-converted/test_ConvTranspose2d", "pytorch-operator/test_operator_chunk", "simple/test_sequence_model1",
    "light/light_resnet50",
]

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_outputs_bit_exact(case: Case):
    result = run_case(case)
    if not result.runnable:
        # Outside the denominator ("every model onnxruntime can run"), but only for a
        # reason of a known kind: a harness bug (an input it cannot feed) must fail here.
        # test_same_proto still checks these cases' round trip structurally.
        assert reason_kind(result.reason) in KNOWN_REASON_KINDS, f"onnxruntime cannot run {case.id}: {result.reason}"
        return
    if case.id in KNOWN_FAILURES:
        assert result.status == "failed" and KNOWN_FAILURES[case.id] in result.reason, (
            f"{case.id} no longer fails with {KNOWN_FAILURES[case.id]!r} (now: {result.status} {result.reason}): "
            "remove it from KNOWN_FAILURES"
        )
        return
    assert result.status == "passed", result.reason


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_same_proto(case: Case):
    difference = check_structure(case)
    assert difference is None, difference


def test_harness_runs_the_cases_it_must():
    by_id = {c.id: c for c in CASES}
    for case_id in MUST_RUN:
        result = run_case(by_id[case_id])
        assert result.status == "passed", (case_id, result.status, result.reason)


def test_every_suite_is_found():
    suites = {c.suite for c in CASES}
    assert suites == {"node", "pytorch-converted", "pytorch-operator", "simple", "light"}
    assert sum(c.suite == "node" for c in CASES) > 1800


# -- the harness notices what it must ----------------------------------------------------
def test_compare_outputs_is_bit_exact():
    x = np.array([1.0, np.nan, -0.0], np.float32)
    assert compare_outputs([x], [x.copy()]) is None
    assert "1 of 3 elements differ" in compare_outputs([x], [np.array([1.0, np.nan, 0.0], np.float32)])
    one_ulp = x.copy()
    one_ulp[0] = np.nextafter(one_ulp[0], np.float32(2))
    assert "1 of 3 elements differ" in compare_outputs([x], [one_ulp])
    other_nan = x.copy()
    other_nan.view(np.uint32)[1] ^= 1  # another NaN payload
    assert compare_outputs([x], [other_nan]) is not None
    assert "float64[3] instead of float32[3]" in compare_outputs([x], [x.astype(np.float64)])
    assert "length 1 instead of 2" in compare_outputs([[x, x]], [[x]])
    assert compare_outputs([None], [None]) is None and compare_outputs([None], [x]) is not None
    strings = np.array(["a", "b"], dtype=object)
    assert compare_outputs([strings], [np.array(["a", "b"], dtype=object)]) is None
    assert compare_outputs([strings], [np.array(["a", "c"], dtype=object)]) is not None
    assert compare_outputs([{1: 0.5}], [{1: 0.25}]) is not None


def test_structure_difference_sees_changes_and_ignores_explicit_defaults():
    node = helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.5)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    explicit = onnx.ModelProto()
    explicit.CopyFrom(model)
    explicit.graph.node[0].domain = ""  # written out, but the default
    assert structure_difference(model, explicit) is None
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.node[0].attribute[0].f = 0.25
    assert "f: 0.25" in structure_difference(model, changed)
    no_shape = onnx.ModelProto()
    no_shape.CopyFrom(model)
    no_shape.graph.output[0].type.tensor_type.ClearField("shape")  # unknown rank is not rank 0
    assert structure_difference(model, no_shape) is not None
