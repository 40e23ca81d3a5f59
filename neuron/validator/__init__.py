"""The validator: rounds of challenges, the judge, scores and weights, and the miner pool the gateway shares."""
