"""mergekit graph tasks carrying curvature, and the planner patch that builds them."""
