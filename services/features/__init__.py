"""Feature-store access: the FeatureReader/ProfileWriter seams and their Feast implementations."""
