"""Pipeline steps: each small, each counting what it did."""
