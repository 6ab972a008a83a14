"""The dev kit: demo, sandbox, simulators and test-site builders; never imported by the product."""
