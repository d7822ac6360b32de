"""Server plumbing shared by both services: create_server, health, reflection, error mapping."""
