"""Parses OpenMetrics text (stdin) with the Prometheus Python client's
strict parser and prints every sample as one JSON object:
{"name{label=value,...}": value}. Exits non-zero if the text does not parse."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

samples = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        samples[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(samples))
