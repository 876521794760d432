"""A user-written pass: `name-nodes` gives nodes short, readable names.

Writing a pass takes a class and a decorator:

  1. subclass `qcompile.Pass` and implement `run(self, model) -> PassResult`; change the
     model (here in place, so `in_place = True`) and say whether anything changed;
  2. declare options as typed class attributes with `option(default, help)`; the
     pipeline text sets them (`name-nodes{prefix=layer,keep=true}`) and the base class
     converts and checks them (unknown options are errors listing the valid ones);
  3. count what you did in `self.stats[...]`; `qcompile --stats` prints the counters;
  4. register the class under a kebab-case name with `@register_pass("name-nodes")`.

Load it from the command line with --plugin, which imports the file so the pass
registers itself, then use its name in --passes like any built-in pass:

    qcompile --plugin examples/custom_pass.py examples/digits_cnn.onnx \\
        --passes 'name-nodes{prefix=layer}' -o out.onnx

or from Python: import the file (importlib) and run
`qcompile.PassManager.parse("name-nodes{prefix=layer}").run(model)`. To ship passes
in a package instead, publish them under the entry-point group `qcompile.passes`.
"""
from __future__ import annotations

import collections

from qcompile import Model, PassResult, Pass, option, register_pass


@register_pass("name-nodes")
class NameNodes(Pass):
    """Name nodes `<prefix>_<op>_<k>` (k counts per op type), in graph order.

    1. By default every node is renamed, replacing exporter names such as
       `/layer1/conv/Conv`; running the pass twice changes nothing the second time.
    2. With `keep=true` only unnamed nodes get a name; existing names stay, and the
       generated names skip any that are taken.
    Nodes of subgraphs (If/Loop bodies) are named too, continuing the same counters.
    """

    in_place = True
    prefix: str = option("n", "prefix of the generated names")
    keep: bool = option(False, "keep existing names and name only the unnamed nodes")

    def run(self, model: Model) -> PassResult:
        nodes = list(model.graph.all_nodes())
        taken = {n.name for n in nodes if n.name} if self.keep else set()
        counters: collections.Counter = collections.Counter()
        for node in nodes:
            if self.keep and node.name:
                continue
            name = self._next_name(node.op_type, counters, taken)
            taken.add(name)
            if node.name != name:
                node.name = name
                self.stats["nodes named"] += 1
        return PassResult(model, modified=self.stats["nodes named"] > 0)

    def _next_name(self, op_type: str, counters: collections.Counter, taken: set) -> str:
        """The first `<prefix>_<op>_<k>` not already taken, advancing the op's counter."""
        while True:
            name = f"{self.prefix}_{op_type}_{counters[op_type]}"
            counters[op_type] += 1
            if name not in taken:
                return name
