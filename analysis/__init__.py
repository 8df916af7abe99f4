"""Trained runs + stores -> concept metrics, figures, HTML report, activation maximisation."""
