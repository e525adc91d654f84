"""Running the pipeline elsewhere: SkyPilot tasks (deploy/sky/) and one dvc queue worker per GPU (queue_gpus)."""
