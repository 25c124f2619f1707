"""Device meshes and logical-axis sharding rules: shared by models, data, clues and the trainer."""
