"""Validates texts against a JSON schema with the `jsonschema` package (Draft 2020-12).

Usage: validate_json.py SCHEMA_FILE < TEXTS (a JSON array of strings). Prints one
line per text that fails (its index, the text, why) and exits 1 if any does; prints
`valid N` otherwise.
"""
import json
import sys

import jsonschema

with open(sys.argv[1]) as f:
    schema = json.load(f)
validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
texts = json.load(sys.stdin)
bad = 0
for i, text in enumerate(texts):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        bad += 1
        print(f"{i}: not JSON ({e}): {text!r}")
        continue
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    if errors:
        bad += 1
        print(f"{i}: {errors[0].message} at {list(errors[0].path)}: {text!r}")
if bad:
    print(f"{bad} of {len(texts)} invalid")
    sys.exit(1)
print(f"valid {len(texts)}")
