"""The N-stream load simulator behind `auralink simulate`.

Pure parts (no Ray, no Redis): `traces` (who is connected when), `audio` (speech-like PCM),
`abusers` (hint traffic plans, honest and abusive), `faults` (what breaks when), `report`
(accounting and the JSON report) and `plots` (PNG figures). `driver` wires them to the real
bridge batching, hint verification, Redis limiter, Serve replicas and fallback supervisor.
"""
