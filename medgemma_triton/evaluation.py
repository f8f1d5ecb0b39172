"""Held-out text for measuring quantized models: never part of a calibration set (gpu/calibration.py)."""

# Written for this project (no third-party text), plain clinical English; teacher-forced perplexity
# and top-1 agreement of quantized decoders are measured on it (benchmarks/int4_quality.py,
# gpu/checkpoint_quality.py).
MEDICAL_TEXT = (
    "Community-acquired pneumonia is an infection of the lung tissue that develops outside of a hospital. "
    "Patients usually present with fever, cough, shortness of breath and chest pain that worsens when "
    "breathing deeply. On examination, the doctor may hear crackles over the affected area of the lung. "
    "A chest radiograph is the standard test to confirm the diagnosis; it typically shows an area of "
    "consolidation, where the air spaces are filled with fluid and inflammatory cells. Blood tests often "
    "reveal a raised white cell count and elevated C-reactive protein. The severity of the illness guides "
    "the choice of treatment: many patients can be treated at home with oral antibiotics, while older "
    "adults and people with low oxygen levels, confusion or low blood pressure may need admission to "
    "hospital. Most patients improve within a few days of starting treatment, although fatigue and cough "
    "can persist for several weeks. Vaccination against influenza and pneumococcus reduces the risk of "
    "infection in vulnerable groups."
)
