"""Stages 3 and 4: MTCNN face detection, FaceXFormer face parsing, and the seven property scores."""
