"""Parses an OpenMetrics exposition from stdin with the Prometheus project's own
parser (prometheus_client.openmetrics.parser), strictly: any format error fails.

Prints one JSON object: {family: {"type": t, "samples": [[name, labels, value], ...]}}.
"""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

families = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    families[family.name] = {
        "type": family.type,
        "samples": [[s.name, s.labels, s.value] for s in family.samples],
    }
print(json.dumps(families))
