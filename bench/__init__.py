"""Microbenchmarks of sparqle's ops against what users would pick instead.
``sparqle bench`` runs them; each ``bench_<op>.py`` defines its cases."""
