import requests
import numpy as np

# Server URL
base_url = "http://localhost:8023"

# Health check
response = requests.get(f"{base_url}/health")
print(response.json())

# Load and process a volume
volume = np.random.randn(48, 48, 48)

# Reconstruct
response = requests.post(
    f"{base_url}/reconstruct",
    json={
        "input_volume": volume.tolist(),
        "use_segmented_decoder": True,
        "use_final_convolution": True,
        "return_embeddings": True
    }
)
result = response.json()
reconstruction = np.array(result['reconstruction'])

# Extract features
response = requests.post(
    f"{base_url}/extract_features",
    json={"input_volume": volume.tolist()}
)
features = response.json()
embedding = np.array(features['embedding'])
pose = np.array(features['pose'])

# Batch processing
volumes = np.random.randn(10, 48, 48, 48)
response = requests.post(
    f"{base_url}/batch_process",
    json={
        "input_volumes": volumes.tolist(),
        "batch_size": 5
    }
)
batch_results = response.json()
